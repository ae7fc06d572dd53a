//! The observer seam: a proxy reports every resolution its balancers apply and every endpoint
//! picked for the requests the observer follows, so a test (or the simulation) can check what
//! the proxy did rather than infer it. Real loopback sockets; each test is bounded in time.
#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use conduit_core::route::RequestView;
use conduit_proxy::observe::{Observer, Pick, RequestKey};
use conduit_proxy::{Proxy, Resolution, StaticDiscover, TokioNet};
use http::{HeaderName, StatusCode};
use support::*;
use tokio::sync::{Notify, oneshot};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Applied {
        authority: String,
        version: u64,
        endpoints: Vec<SocketAddr>,
    },
    Picked {
        request: u64,
        authority: String,
        version: u64,
        endpoint: SocketAddr,
    },
}

/// Records every event; follows requests by their `x-request-id`.
#[derive(Debug, Default)]
struct Recording {
    events: Mutex<Vec<Event>>,
    changed: Notify,
}

impl Recording {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn applied(&self) -> Vec<(u64, Vec<SocketAddr>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Applied {
                    version, endpoints, ..
                } => Some((version, endpoints)),
                Event::Picked { .. } => None,
            })
            .collect()
    }

    fn picks(&self, request: u64) -> Vec<(u64, SocketAddr)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Picked {
                    request: r,
                    version,
                    endpoint,
                    ..
                } if r == request => Some((version, endpoint)),
                _ => None,
            })
            .collect()
    }

    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }

    /// Waits until `n` resolutions have been applied.
    async fn applied_at_least(&self, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.applied().len() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl Observer for Recording {
    fn applied(&self, authority: &str, resolution: &Resolution) {
        if let Resolution::Service { version, service } = resolution {
            self.push(Event::Applied {
                authority: authority.to_owned(),
                version: *version,
                endpoints: service.endpoints.iter().map(|e| e.addr).collect(),
            });
        }
    }

    fn request(&self, head: &dyn RequestView) -> Option<RequestKey> {
        let mut id = None;
        head.any_header(&HeaderName::from_static("x-request-id"), &mut |value| {
            id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            true
        });
        id.map(RequestKey)
    }

    fn picked(&self, pick: &Pick<'_>) {
        self.push(Event::Picked {
            request: pick.request.0,
            authority: pick.authority.to_owned(),
            version: pick.version,
            endpoint: pick.endpoint,
        });
    }
}

/// A proxy reporting to `observer`, discovering through the returned `StaticDiscover`.
async fn observed_proxy(
    config: conduit_proxy::ProxyConfig,
    mesh: conduit_core::mesh::Mesh,
    observer: Arc<Recording>,
) -> (
    conduit_proxy::Addrs,
    Arc<StaticDiscover>,
    oneshot::Sender<()>,
) {
    let proxy = Proxy::bind(config, TokioNet)
        .await
        .unwrap()
        .with_observer(observer);
    let addrs = proxy.addrs();
    let discovery = Arc::new(StaticDiscover::new(mesh));
    let (stop, stopped) = oneshot::channel::<()>();
    let d = Arc::clone(&discovery);
    tokio::spawn(async move {
        let _ = proxy
            .serve(d, 7, async move {
                let _ = stopped.await;
            })
            .await;
    });
    (addrs, discovery, stop)
}

fn with_id(mut request: http::Request<TestBody>, id: u64) -> http::Request<TestBody> {
    request
        .headers_mut()
        .insert("x-request-id", http::HeaderValue::from(id));
    request
}

#[tokio::test]
async fn every_applied_resolution_and_every_pick_of_a_followed_request_is_reported() {
    bounded(async {
        let a = named_backend("a").await;
        let b = named_backend("b").await;
        let name = |addr: SocketAddr| if addr == a { "a" } else { "b" };
        let observer = Arc::new(Recording::default());
        let (addrs, discovery, _stop) = observed_proxy(
            config(),
            mesh(&[("web.test", &[a, b])]),
            Arc::clone(&observer),
        )
        .await;

        // HTTP/1.1: the answer comes from the endpoint reported picked, under the version
        // reported applied.
        let mut h1 = h1_client(addrs.outbound).await;
        let response = h1
            .send_request(with_id(get("web.test", "/"), 1))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let served = body_bytes(response).await;
        let applied = observer.applied();
        assert_eq!(applied.len(), 1);
        let (first_version, first_endpoints) = &applied[0];
        assert_eq!(first_endpoints, &vec![a, b]);
        let picks = observer.picks(1);
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].0, *first_version);
        assert_eq!(name(picks[0].1), served);

        // A new mesh: applied under a higher version, and requests are picked under it.
        discovery.publish(mesh(&[("web.test", &[b])]));
        observer.applied_at_least(2).await;
        let applied = observer.applied();
        assert!(applied[1].0 > *first_version);
        assert_eq!(applied[1].1, vec![b]);
        let response = h1
            .send_request(with_id(get("web.test", "/"), 2))
            .await
            .unwrap();
        assert_eq!(body_bytes(response).await, "b");
        assert_eq!(observer.picks(2), vec![(applied[1].0, b)]);

        // A request the observer does not follow is not reported.
        let before = observer.events().len();
        let response = h1.send_request(get("web.test", "/")).await.unwrap();
        assert_eq!(body_bytes(response).await, "b");
        assert_eq!(observer.events().len(), before);
        assert!(observer.events().iter().all(|e| match e {
            Event::Applied { authority, .. } | Event::Picked { authority, .. } =>
                authority == "web.test",
        }));
    })
    .await;
}

#[tokio::test]
async fn a_request_sent_again_reports_each_pick_in_order() {
    bounded(async {
        // A port that was bound and released: connections are refused, and the request, never
        // processed, is picked again for another endpoint.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let app = named_backend("app").await;
        let mut config = config();
        // A fresh endpoint looks cheaper than any measured one, so the closed endpoint is
        // picked as soon as it is a candidate (by the second request at the latest).
        config.balancer.default_rtt = std::time::Duration::from_micros(1);
        let observer = Arc::new(Recording::default());
        let (addrs, _discovery, _stop) = observed_proxy(
            config,
            mesh(&[("web.test", &[closed, app])]),
            Arc::clone(&observer),
        )
        .await;
        let mut client = h1_client(addrs.outbound).await;
        let mut resent = 0;
        for id in 0..20 {
            let response = client
                .send_request(with_id(get("web.test", "/"), id))
                .await
                .unwrap();
            assert_eq!(body_bytes(response).await, "app");
            let picks = observer.picks(id);
            assert_eq!(
                picks.last().map(|p| p.1),
                Some(app),
                "request {id}: {picks:?}"
            );
            if picks.len() > 1 {
                assert_eq!(picks[0].1, closed, "request {id}: {picks:?}");
                resent += 1;
            }
        }
        assert!(resent >= 1, "no request met the closed endpoint");
    })
    .await;
}
