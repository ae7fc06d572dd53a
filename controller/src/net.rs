//! tokio's network for the production binary: a listener as a stream of accepted connections.
//!
//! The controller itself only sees the stream; the simulation builds the same shape from
//! turmoil's listener.

use std::io;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};

/// The pause after a failed accept (out of file descriptors, say), so a persistent failure
/// does not spin a core.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The connections `listener` accepts, with `TCP_NODELAY` set (gRPC messages are small and
/// latency matters more than packet count).
pub fn tcp_incoming(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> + Send {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await;
        let accepted = match accepted {
            Ok((stream, _peer)) => {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "could not set TCP_NODELAY");
                }
                Ok(stream)
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                Err(err)
            }
        };
        Some((accepted, listener))
    })
}
