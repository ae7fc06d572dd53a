//! The `date` header seam (turmoil.md §4.1).
//!
//! hyper adds a `date` header to every HTTP/2 response it serves, read from the real clock, and
//! tonic offers no switch. hyper only adds it when it is absent, so setting it first keeps the
//! real clock out: [`DateHeaderLayer`] does that when given a value (the simulation gives a
//! fixed one) and is a pass-through otherwise (production sends the real date).

use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use http::{HeaderValue, Response, header::DATE};

/// Sets a fixed `date` header on every response, when it has one.
#[derive(Clone, Debug, Default)]
pub struct DateHeaderLayer {
    value: Option<HeaderValue>,
}

impl DateHeaderLayer {
    /// A layer setting `date: value`, or passing responses through when `None`.
    #[must_use]
    pub fn new(value: Option<HeaderValue>) -> Self {
        Self { value }
    }
}

impl<S> tower::Layer<S> for DateHeaderLayer {
    type Service = DateHeader<S>;

    fn layer(&self, inner: S) -> DateHeader<S> {
        DateHeader {
            inner,
            value: self.value.clone(),
        }
    }
}

/// The service [`DateHeaderLayer`] makes.
#[derive(Clone, Debug)]
pub struct DateHeader<S> {
    inner: S,
    value: Option<HeaderValue>,
}

impl<S, Request, B> tower::Service<Request> for DateHeader<S>
where
    S: tower::Service<Request, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let response = self.inner.call(request);
        let value = self.value.clone();
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(value) = value {
                response.headers_mut().insert(DATE, value);
            }
            Ok(response)
        })
    }
}
