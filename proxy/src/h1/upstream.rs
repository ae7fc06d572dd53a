//! What an HTTP/1 attempt holds upstream: a pooled connection checked out for it, and the
//! response head it got with the connection it arrived on. Shared by the engine's own attempts
//! (`conn`) and its hedges (`copy`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;

use conduit_core::time::Instant;

use super::codec::ResponseHead;
use super::io::{Pump, Upstream};
use crate::errors::ProxyError;
use crate::net::Net;
use crate::pool::Pools;

/// A connection for one attempt to `addr`, and whether it was pooled: an idle one if the pool
/// has one; otherwise whichever comes first of a new connection and one that another attempt
/// returns meanwhile. A connect that loses the race runs on and its connection joins the pool,
/// so the pool still grows to the endpoint's concurrency; its failure, if it fails, is no
/// attempt's. A connect that fails while nothing was returned is this attempt's error.
pub(crate) async fn acquire<N: Net>(
    pools: &Arc<Pools<N>>,
    addr: SocketAddr,
    now: Instant,
) -> Result<(Upstream<N>, bool), ProxyError> {
    if let Some(upstream) = checkout(pools, addr, now).await {
        return Ok((upstream, true));
    }
    connect_or_returned(pools, addr).await
}

/// [`acquire`] once the pool had no idle connection to `addr`.
pub(crate) async fn connect_or_returned<N: Net>(
    pools: &Arc<Pools<N>>,
    addr: SocketAddr,
) -> Result<(Upstream<N>, bool), ProxyError> {
    let mut waiter = pools.wait_h1(addr);
    let (send, mut connected) = tokio::sync::oneshot::channel();
    let connecting = Arc::clone(pools);
    tokio::spawn(async move {
        let result = connecting.connect(addr).await;
        match send.send(result) {
            Ok(()) => {}
            Err(Ok(io)) => {
                // The attempt took a returned connection (or is gone): this one is spare.
                let now = connecting.clock.now();
                connecting.checkin_h1(addr, Upstream::<N>::new(io, BytesMut::new()), now);
            }
            Err(Err(error)) => {
                tracing::debug!(endpoint = %addr, %error, "connect no attempt waited for failed");
            }
        }
    });
    tokio::select! {
        biased;
        upstream = waiter.returned() => Ok((upstream, true)),
        result = &mut connected => match result {
            // Dropped on return, the waiter gives a connection handed over meanwhile to the
            // next attempt waiting or to the pool.
            Ok(Ok(io)) => Ok((Upstream::<N>::new(io, BytesMut::new()), false)),
            // A connection handed over meanwhile serves instead of the failed connect.
            failed => match waiter.leave() {
                Some(upstream) => Ok((upstream, true)),
                None => Err(match failed {
                    Ok(Err(error)) => error,
                    // The connect task ends without sending only if the runtime is shutting
                    // down.
                    _ => ProxyError::Connect {
                        addr,
                        source: std::io::Error::other("the connect was cancelled"),
                    },
                }),
            },
        },
    }
}

/// An idle pooled connection to `addr` that is still open.
pub(crate) async fn checkout<N: Net>(
    pools: &Pools<N>,
    addr: SocketAddr,
    now: Instant,
) -> Option<Upstream<N>> {
    while let Some(mut upstream) = pools.checkout_h1(addr, now) {
        // An idle connection has nothing to say: input (or its end) means the server closed
        // it or broke protocol. Polling costs no syscall while nothing arrived.
        let alive =
            std::future::poll_fn(|cx| Poll::Ready(upstream.poll_read_more(cx).is_pending())).await;
        if alive {
            return Some(upstream);
        }
        tracing::trace!(endpoint = %addr, "pooled connection closed while idle");
    }
    None
}

/// A response head from the upstream, with the connection it arrived on.
pub(crate) struct H1Response<N: Net> {
    pub(crate) upstream: Upstream<N>,
    pub(crate) head: ResponseHead,
    /// The rest of the request, when the upstream answered before it was sent whole.
    pub(crate) upload: Upload,
    pub(crate) addr: SocketAddr,
}

/// Where the request stands when its response head arrives.
#[derive(Debug)]
pub(crate) enum Upload {
    /// Sent whole.
    Done,
    /// Still moving (full-duplex streaming, or an early answer).
    Moving(Pump),
    /// Sending it failed: neither connection can carry another request.
    Broken,
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;
    use crate::admin::metrics::{Direction, Metrics};
    use crate::clock::Clock;
    use crate::config::ProxyConfig;
    use crate::net::{TokioListener, TokioNet};

    /// Loopback, with each connect held until the test lets one through.
    #[derive(Clone)]
    struct GatedNet {
        gate: Arc<Semaphore>,
        connects: Arc<AtomicUsize>,
    }

    impl Net for GatedNet {
        type Io = tokio::net::TcpStream;
        type Listener = TokioListener;

        async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
            TokioNet.bind(addr).await
        }

        async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Io> {
            self.connects.fetch_add(1, Ordering::Relaxed);
            self.gate.acquire().await.expect("open").forget();
            TokioNet.connect(addr).await
        }

        async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            TokioNet.resolve(host, port).await
        }
    }

    /// An endpoint on loopback that accepts and holds every connection, and pools over a
    /// gated network that lets `permits` connects through.
    async fn setup(permits: usize) -> (SocketAddr, Arc<Pools<GatedNet>>, GatedNet) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let net = GatedNet {
            gate: Arc::new(Semaphore::new(permits)),
            connects: Arc::default(),
        };
        let clock = Clock::new();
        let config =
            ProxyConfig::with_discovery(crate::config::DiscoveryConfig::File("unused".into()));
        let metrics = Arc::new(Metrics::new(clock, config.metrics));
        let pools = Pools::new(
            net.clone(),
            clock,
            config.limits,
            metrics,
            Direction::Outbound,
            crate::pool::Security::default(),
        );
        (addr, Arc::new(pools), net)
    }

    /// An attempt on its own task: whether it got a pooled connection.
    fn spawn_acquire(
        pools: &Arc<Pools<GatedNet>>,
        addr: SocketAddr,
        now: Instant,
    ) -> tokio::task::JoinHandle<Result<bool, ProxyError>> {
        let pools = Arc::clone(pools);
        tokio::spawn(async move { acquire(&pools, addr, now).await.map(|(_, r)| r) })
    }

    /// Runs other tasks (and the IO driver) until `done` holds, or fails after 10 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_attempt_whose_connect_hangs_takes_a_connection_another_returns() {
        let (addr, pools, net) = setup(1).await;
        let now = pools.clock.now();
        let (first, reused) = acquire(&pools, addr, now).await.unwrap();
        assert!(!reused, "the pool was empty: a new connection");

        // The second attempt's connect is held at the gate: it queues for a returned one.
        let waiting = spawn_acquire(&pools, addr, now);
        until("the second attempt waits", || pools.idle_h1(addr) == (0, 1)).await;
        pools.checkin_h1(addr, first, now);
        assert!(
            waiting.await.unwrap().unwrap(),
            "it took the returned connection"
        );
        assert_eq!(pools.idle_h1(addr), (0, 0), "handed over, not pooled");

        // Its own connect, once through, is not wasted: the connection joins the pool.
        net.gate.add_permits(1);
        until("the spare connection is pooled", || {
            pools.idle_h1(addr) == (1, 0)
        })
        .await;
        assert_eq!(net.connects.load(Ordering::Relaxed), 2);
        let (_, reused) = acquire(&pools, addr, now).await.unwrap();
        assert!(reused, "the third attempt reuses the spare connection");
        assert_eq!(net.connects.load(Ordering::Relaxed), 2, "and opens none");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_attempt_whose_connect_wins_leaves_the_queue() {
        let (addr, pools, net) = setup(0).await;
        let now = pools.clock.now();
        let attempt = spawn_acquire(&pools, addr, now);
        until("the attempt waits", || pools.idle_h1(addr) == (0, 1)).await;
        net.gate.add_permits(1);
        assert!(!attempt.await.unwrap().unwrap(), "its own new connection");
        assert_eq!(pools.idle_h1(addr), (0, 0), "no longer queued");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_attempt_leaves_the_queue() {
        let (addr, pools, _net) = setup(0).await;
        let now = pools.clock.now();
        let attempt = spawn_acquire(&pools, addr, now);
        until("the attempt waits", || pools.idle_h1(addr) == (0, 1)).await;
        attempt.abort();
        assert!(attempt.await.unwrap_err().is_cancelled());
        assert_eq!(pools.idle_h1(addr), (0, 0), "its place is gone with it");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_connect_is_the_attempt_error_when_nothing_was_returned() {
        // Nothing listens on a port just released.
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (_, pools, net) = setup(1).await;
        let error = acquire(&pools, addr, pools.clock.now()).await.unwrap_err();
        assert!(matches!(error, ProxyError::Connect { .. }), "{error}");
        assert_eq!(net.connects.load(Ordering::Relaxed), 1);
        assert_eq!(pools.idle_h1(addr), (0, 0));
    }
}
