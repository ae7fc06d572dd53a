//! Circuit breaking over real loopback sockets, on both engines: a backend that fails every
//! request is ejected (the healthy one serves the traffic), probed once its penalty ends (one
//! probe at a time), and readmitted when the probe succeeds; and however many backends fail,
//! at most half of a service's endpoints are ejected and the proxy never refuses a request
//! because of its breakers.
//!
//! The tests wait on events (a backend's counters, a probe arriving, a metrics line), never on
//! the clock: penalties are configured short so a probe comes soon, and a probe the test needs
//! to hold is held by the backend until the test releases it. Each test is bounded in time.
#![expect(
    clippy::unwrap_used,
    reason = "test scaffolding: a failed setup or request is the report"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use support::*;
use tokio::sync::{mpsc, oneshot};

const ERROR_HEADER: &str = "conduit-proxy-error";

/// A backend whose health the test controls: it answers 500 while `failing`, 200 otherwise,
/// with its name as the body; while `hold` is set it holds each request until the test
/// releases it through the sender it reports on `held`.
struct Backend {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    held: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
}

impl Backend {
    async fn start(name: &'static str, h2: bool, failing: bool) -> Self {
        let served = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(failing));
        let hold = Arc::new(AtomicBool::new(false));
        let (tx, held) = mpsc::unbounded_channel();
        let (s, f, h) = (Arc::clone(&served), Arc::clone(&failing), Arc::clone(&hold));
        let addr = backend(h2, move |_request| {
            let (served, failing, hold, tx) =
                (Arc::clone(&s), Arc::clone(&f), Arc::clone(&h), tx.clone());
            async move {
                served.fetch_add(1, Ordering::SeqCst);
                if hold.load(Ordering::SeqCst) {
                    let (release, released) = oneshot::channel();
                    let _ = tx.send(release);
                    let _ = released.await;
                }
                let mut response = Response::new(full(name));
                if failing.load(Ordering::SeqCst) {
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                }
                response
            }
        })
        .await;
        Self {
            addr,
            served,
            failing,
            hold,
            held,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// A mesh of one service, `web.test`, over `endpoints`, with the `breaker` block given.
fn mesh_with_breaker(endpoints: &[SocketAddr], breaker: &str) -> conduit_core::mesh::Mesh {
    let mut yaml = String::from("services:\n  web.test:\n    port: 80\n    endpoints:\n");
    for addr in endpoints {
        yaml.push_str(&format!("      - addr: {addr}\n"));
    }
    yaml.push_str(&format!("    breaker: {breaker}\n"));
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

/// What a client saw of one response.
#[derive(Debug)]
struct Seen {
    status: StatusCode,
    body: Bytes,
    /// The proxy answered itself.
    proxy_error: bool,
}

/// One GET for `web.test` through the outbound proxy at `outbound`, on a fresh connection of
/// the engine's protocol.
async fn send(h2: bool, outbound: SocketAddr) -> Seen {
    let response = if h2 {
        let mut client = h2_client(outbound).await;
        let request = http::Request::builder()
            .uri("http://web.test/")
            .body(full(""))
            .unwrap();
        client.send_request(request).await.unwrap()
    } else {
        get_once(outbound, "web.test", "/").await
    };
    let status = response.status();
    let proxy_error = response.headers().contains_key(ERROR_HEADER);
    Seen {
        status,
        body: body_bytes(response).await,
        proxy_error,
    }
}

/// Sends `n` requests at once and returns what each client saw.
async fn batch(h2: bool, outbound: SocketAddr, n: usize) -> Vec<Seen> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(send(h2, outbound))).collect();
    let mut seen = Vec::with_capacity(n);
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    seen
}

/// The value of the metrics line that starts with `series`, if present.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Scrapes until the line `series` reads `value`.
async fn await_metric(admin: SocketAddr, series: &str, value: u64) -> String {
    loop {
        let text = scrape(admin).await;
        if metric(&text, series) == Some(value) {
            return text;
        }
    }
}

const EJECTED: &str = "balancer_endpoints{authority=\"web.test:80\",state=\"ejected\"}";
const BY_FAILURES: &str =
    "endpoint_ejections_total{authority=\"web.test:80\",reason=\"consecutive_failures\"}";
const BY_RATE: &str = "endpoint_ejections_total{authority=\"web.test:80\",reason=\"success_rate\"}";

/// A failing backend is ejected after three failures in a row and the healthy one serves
/// everything else; once its penalty ends exactly one probe reaches it, and no other request
/// does while the probe is out; it heals, the probe succeeds, and it serves again.
#[tokio::test]
async fn a_failing_backend_is_ejected_then_probed_back_in() {
    for h2 in [false, true] {
        bounded(ejected_then_probed_back_in(h2)).await;
    }
}

async fn ejected_then_probed_back_in(h2: bool) {
    let good = Backend::start("good", h2, false).await;
    let mut bad = Backend::start("bad", h2, true).await;
    let breaker = "{ consecutive_failures: 3, success_rate: { threshold_per_mille: 0 }, \
                   backoff: { min: 20ms, max: 20ms, jitter_per_mille: 0 } }";
    let mesh = mesh_with_breaker(&[good.addr, bad.addr], breaker);
    let mut proxy = TestProxy::start(config(), mesh).await;
    let (outbound, admin) = (proxy.addrs.outbound, proxy.addrs.admin);

    // Until the bad backend has failed three times. Requests go out four at a time, so the
    // balancer spreads them over both backends whatever their latency.
    while bad.served() < 3 {
        for seen in batch(h2, outbound, 4).await {
            assert!(!seen.proxy_error, "{seen:?}");
        }
    }
    let text = await_metric(admin, BY_FAILURES, 1).await;
    assert_eq!(metric(&text, EJECTED), Some(1), "{text}");
    assert_eq!(metric(&text, BY_RATE), Some(0), "{text}");

    // From now on, a request reaching the bad backend is held there: the probe.
    bad.hold.store(true, Ordering::SeqCst);
    let at_ejection = bad.served();
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let mut outstanding = 0;
    let mut probe = None;
    let mut after_probe = 0;
    // Two requests in flight at a time (besides a held probe), until the probe has arrived and
    // twenty more requests have been answered after it.
    while probe.is_none() || after_probe < 20 {
        while outstanding < 2 {
            let answers_tx = answers_tx.clone();
            tokio::spawn(async move {
                let _ = answers_tx.send(send(h2, outbound).await);
            });
            outstanding += 1;
        }
        tokio::select! {
            Some(seen) = answers.recv() => {
                outstanding -= 1;
                assert_eq!(
                    (seen.status, &seen.body[..], seen.proxy_error),
                    (StatusCode::OK, &b"good"[..], false),
                    "while ejected or probing, the healthy backend serves"
                );
                if probe.is_some() {
                    after_probe += 1;
                }
            }
            Some(release) = bad.held.recv(), if probe.is_none() => {
                // The probe's request stays out until released; it no longer counts.
                outstanding -= 1;
                probe = Some(release);
            }
        }
    }
    assert_eq!(
        bad.served(),
        at_ejection + 1,
        "exactly one probe, and nothing else while it is out"
    );

    // The backend heals; the probe succeeds and it is back in rotation.
    bad.failing.store(false, Ordering::SeqCst);
    bad.hold.store(false, Ordering::SeqCst);
    let _ = probe.take().unwrap().send(());
    let text = await_metric(admin, EJECTED, 0).await;
    assert_eq!(metric(&text, BY_FAILURES), Some(1), "{text}");
    let before = bad.served();
    while bad.served() == before {
        for seen in batch(h2, outbound, 4).await {
            assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
        }
    }
    proxy.stop();
}

/// Four backends that fail every request: two are ejected (half), the other two keep serving
/// (and failing) every request, and the proxy answers nothing itself.
#[tokio::test]
async fn never_more_than_half_of_a_service_is_ejected() {
    for h2 in [false, true] {
        bounded(never_more_than_half(h2)).await;
    }
}

async fn never_more_than_half(h2: bool) {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        backends.push(Backend::start(name, h2, true).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // A penalty far longer than the test: ejected backends are never probed here.
    let breaker = "{ consecutive_failures: 3, backoff: { min: 1h, max: 1h } }";
    let mut proxy = TestProxy::start(config(), mesh_with_breaker(&addrs, breaker)).await;
    let (outbound, admin) = (proxy.addrs.outbound, proxy.addrs.admin);

    // Until two are out.
    loop {
        for seen in batch(h2, outbound, 4).await {
            assert_eq!(seen.status, StatusCode::INTERNAL_SERVER_ERROR, "{seen:?}");
            assert!(!seen.proxy_error, "never refused for the breaker: {seen:?}");
        }
        let text = scrape(admin).await;
        if metric(&text, EJECTED) == Some(2) {
            break;
        }
        assert!(metric(&text, EJECTED).unwrap_or(0) < 2, "{text}");
    }
    let before: Vec<usize> = backends.iter().map(Backend::served).collect();
    for _ in 0..10 {
        for seen in batch(h2, outbound, 4).await {
            assert_eq!(seen.status, StatusCode::INTERNAL_SERVER_ERROR, "{seen:?}");
            assert!(!seen.proxy_error, "never refused for the breaker: {seen:?}");
        }
    }
    let after: Vec<usize> = backends.iter().map(Backend::served).collect();
    let serving = before.iter().zip(&after).filter(|(b, a)| a > b).count();
    assert!(
        (1..=2).contains(&serving),
        "only the two left in rotation serve: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.iter().sum::<usize>() - before.iter().sum::<usize>(),
        40
    );
    let text = scrape(admin).await;
    assert_eq!(metric(&text, EJECTED), Some(2), "{text}");
    assert_eq!(metric(&text, BY_FAILURES), Some(2), "{text}");
    proxy.stop();
}
