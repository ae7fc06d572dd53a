//! What both directions' HTTP/2 connections (the server and client modules beside this one)
//! share: their windows, and the keep-alive ping timeout.
//!
//! Both directions send keep-alive pings so a peer that vanished without closing (a partition,
//! a crashed host) is found: a ping every interval, and the connection ends when one goes
//! unanswered for [`PING_TIMEOUT`].

use std::time::Duration;

/// How long a keep-alive ping may go unanswered before the connection is given up.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Each stream's receive window: what a peer may send on one stream before the proxy hands
/// it on. The connection's window bounds all streams together.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;

/// Each connection's receive window: the most a peer can make the proxy hold for it.
pub(crate) const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The most a stream queues to send beyond what the peer's window takes.
pub(crate) const SEND_BUFFER: usize = 256 * 1024;
