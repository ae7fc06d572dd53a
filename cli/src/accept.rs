//! Accepting connections for the command's own servers (the demo workload, the hello backend,
//! the admission webhook, the chaos links).
//!
//! An accept that fails (the process is out of descriptors, `EMFILE`; the system is, `ENFILE`;
//! kernel memory) leaves the listener readable, so retrying at once fails again at once: the
//! server spins a core while it can accept nothing, starving whatever shares that core (on a
//! benchmark, the proxy under test). After a failure the server logs it and pauses before the
//! next accept, as the proxy and the controller do.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long to pause accepting after an accept error.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A source of connections ([`TcpListener`]; a scripted one in tests).
pub trait Listen {
    /// An accepted connection.
    type Conn;

    /// Accepts the next connection.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;
}

impl Listen for TcpListener {
    type Conn = TcpStream;

    fn accept_one(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        self.accept()
    }
}

/// The next connection `listener` accepts and its peer, pausing
/// [`ACCEPT_ERROR_BACKOFF`] after each failed accept.
pub async fn accept<L: Listen + Sync>(listener: &L) -> (L::Conn, SocketAddr) {
    loop {
        match listener.accept_one().await {
            Ok(accepted) => return accepted,
            Err(err) => {
                tracing::warn!(error = %err, pause = ?ACCEPT_ERROR_BACKOFF, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Fails its first `failures` accepts with `EMFILE`, then accepts.
    struct Exhausted {
        failures: u32,
        calls: AtomicU32,
    }

    impl Listen for Exhausted {
        type Conn = u32;

        fn accept_one(&self) -> impl Future<Output = io::Result<(u32, SocketAddr)>> + Send {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            let result = if call < self.failures {
                Err(io::Error::from_raw_os_error(24)) // EMFILE
            } else {
                Ok((call, SocketAddr::from(([127, 0, 0, 1], 9))))
            };
            std::future::ready(result)
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_full_descriptor_table_pauses_accepting_instead_of_spinning() {
        let listener = Exhausted {
            failures: 20,
            calls: AtomicU32::new(0),
        };
        let clock = conduit_proxy::clock::Clock::new();
        let start = clock.now();
        let (conn, _) = accept(&listener).await;
        // The 21st accept succeeds, after a pause behind each of the 20 failures: one second
        // of (paused) time, so at most 20 failed calls a second however long it lasts.
        assert_eq!(conn, 20);
        assert_eq!(listener.calls.load(Ordering::Relaxed), 21);
        assert_eq!(clock.now() - start, ACCEPT_ERROR_BACKOFF * 20);
    }
}
