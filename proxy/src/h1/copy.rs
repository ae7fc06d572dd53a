//! Hedges on the HTTP/1 engine: a copy of the request (its head as forwarded and its whole
//! body) sent on a connection of its own, beside the engine's attempt, which holds the
//! client's connection. The copy's response head is parsed into a buffer of its own; if it
//! wins, the engine adopts it ([`H1Response`]) and streams it like its own.

use std::io;
use std::sync::Arc;
use std::task::Poll;

use bytes::Buf;
use http::StatusCode;

use super::codec::{self, RequestHead, ResponseHead};
use super::io::Upstream;
use super::upstream::{H1Response, Upload, acquire};
use crate::clock::Clock;
use crate::errors::ProxyError;
use crate::exchange::{Attempt, BoxedSend, Facts, Failed, RequestCopy, Sent};
use crate::net::Net;
use crate::pool::Pools;

/// A copy of an HTTP/1 request for hedges.
pub(crate) struct H1Copy<N: Net>(Arc<Copied<N>>);

struct Copied<N: Net> {
    pools: Arc<Pools<N>>,
    clock: Clock,
    head: RequestHead,
    /// The head as forwarded, without its framing fields.
    forward: Vec<u8>,
    /// The client's own `grpc-timeout` value (sent when the attempt gives none).
    grpc_timeout: Vec<u8>,
    /// The whole body, framed as sent upstream.
    body: Vec<u8>,
}

impl<N: Net> H1Copy<N> {
    pub(crate) fn new(
        pools: Arc<Pools<N>>,
        head: RequestHead,
        forward: Vec<u8>,
        grpc_timeout: Vec<u8>,
        body: Vec<u8>,
    ) -> Self {
        let clock = pools.clock;
        Self(Arc::new(Copied {
            pools,
            clock,
            head,
            forward,
            grpc_timeout,
            body,
        }))
    }
}

/// A hedge's response head, with the connection it arrived on and the head as the client
/// gets it.
pub(crate) struct H1Hedged<N: Net> {
    pub(crate) response: H1Response<N>,
    /// The response head as forwarded to the client, without its framing fields.
    pub(crate) client_head: Vec<u8>,
}

impl<N: Net> RequestCopy for H1Copy<N> {
    type Response = H1Hedged<N>;

    fn whole(&self) -> Option<bool> {
        // Made only from a request whose body was whole in hand.
        Some(true)
    }

    fn send(&self, attempt: Attempt) -> BoxedSend<H1Hedged<N>> {
        Box::pin(send(Arc::clone(&self.0), attempt))
    }

    fn facts(response: &H1Hedged<N>) -> Facts<'_> {
        let head = &response.response.head;
        Facts {
            status: StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY),
            grpc: head.grpc,
            grpc_status: head
                .grpc_status
                .clone()
                .map(|range| &response.response.upstream.rbuf[range]),
        }
    }
}

async fn send<N: Net>(copy: Arc<Copied<N>>, attempt: Attempt) -> Result<Sent<H1Hedged<N>>, Failed> {
    let addr = attempt.addr;
    let pools = &copy.pools;
    let clock = copy.clock;
    let (mut upstream, reused) = match acquire(pools, addr, clock.now()).await {
        Ok(acquired) => acquired,
        Err(error) => return Err(Failed::unprocessed(error)),
    };
    upstream.wbuf.extend_from_slice(&copy.forward);
    let grpc_timeout = match (&attempt.grpc_timeout, copy.grpc_timeout.is_empty()) {
        (Some(value), _) => Some(value.as_bytes()),
        (None, false) => Some(&copy.grpc_timeout[..]),
        (None, true) => None,
    };
    codec::finish_request_head(&mut upstream.wbuf, &copy.head, grpc_timeout);
    upstream.wbuf.extend_from_slice(&copy.body);
    // Response headers are awaited until the response timeout or the attempt's deadline.
    let sent = clock.now();
    let wake = match (
        pools.limits.response_timeout.map(|t| sent + t),
        attempt.deadline,
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let received = receive(&copy, &mut upstream, addr);
    let result = match wake {
        None => received.await,
        Some(wake) => tokio::select! {
            result = received => result,
            () = clock.sleep_until(wake) => Err(if attempt.deadline.is_some_and(|d| wake >= d) {
                Failed::deadline()
            } else {
                let timeout = pools.limits.response_timeout.unwrap_or_default();
                Failed::new(ProxyError::ResponseTimeout { addr, timeout })
            }),
        },
    };
    let connected = !reused;
    match result {
        Ok((head, client_head)) => Ok(Sent {
            response: H1Hedged {
                response: H1Response {
                    upstream,
                    head,
                    upload: Upload::Done,
                    addr,
                },
                client_head,
            },
            connected,
        }),
        Err(mut failed) => {
            failed.connected = connected;
            Err(failed)
        }
    }
}

/// Writes the request and reads the final response head (interim responses are dropped: the
/// client hears those of the engine's own attempt).
async fn receive<N: Net>(
    copy: &Copied<N>,
    upstream: &mut Upstream<N>,
    addr: std::net::SocketAddr,
) -> Result<(ResponseHead, Vec<u8>), Failed> {
    let max = copy.pools.limits.max_header_bytes;
    let mut client_head = Vec::new();
    let mut write_failed = false;
    std::future::poll_fn(|cx| {
        loop {
            if upstream.has_output()
                && !write_failed
                && let Poll::Ready(Err(err)) = upstream.poll_write_out(cx)
            {
                // Keep reading: the upstream may have answered before closing.
                tracing::debug!(endpoint = %addr, error = %err, "hedge not sent");
                write_failed = true;
            }
            client_head.clear();
            match codec::parse_response(&upstream.rbuf, max, &copy.head, &mut client_head) {
                Ok(Some(response)) if (100..200).contains(&response.status) => {
                    upstream.rbuf.advance(response.len);
                    continue;
                }
                Ok(Some(response)) => {
                    if write_failed || upstream.has_output() {
                        // Answered before the request was sent whole: the connection cannot
                        // be reused, and an early answer is not the hedge's to give.
                        return Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                            addr,
                            source: "answered before the hedge was sent whole".into(),
                        })));
                    }
                    return Poll::Ready(Ok((response, std::mem::take(&mut client_head))));
                }
                Ok(None) => {}
                Err(err) => {
                    return Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                        addr,
                        source: format!("invalid response: {err}").into(),
                    })));
                }
            }
            return match upstream.poll_read_more(cx) {
                Poll::Ready(Ok(0)) => Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before response headers",
                    )
                    .into(),
                }))),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(err)) => Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                    addr,
                    source: err.into(),
                }))),
                Poll::Pending => Poll::Pending,
            };
        }
    })
    .await
}

/// The length of the request's body when it is sized (`Content-Length`) and fits `limit`: a
/// hedged request's body is read whole before its first attempt.
pub(crate) fn small_body(head: &RequestHead, limit: usize) -> Option<usize> {
    match head.body {
        codec::Framing::Length(n) => usize::try_from(n).ok().filter(|&n| n <= limit),
        _ => None,
    }
}
