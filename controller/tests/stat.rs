//! `StatSummary` and `RouteSummary`: the controller scrapes each endpoint's proxy admin server
//! twice, a window apart, and reports the workload's figures (per route for `RouteSummary`)
//! over that window.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use conduit_controller::api::ApiService;
use conduit_controller::discovery::file::FileDiscovery;
use conduit_controller::stat::{MetricsSource, ScrapeError};
use conduit_proto::pb::api::api_server::Api;
use conduit_proto::pb::api::{RouteSummaryRequest, StatSummaryRequest};
use tonic::Request;

/// Serves canned expositions: each admin address answers its next text per scrape.
#[derive(Default)]
struct Canned(Mutex<BTreeMap<SocketAddr, Vec<String>>>);

impl MetricsSource for Canned {
    fn scrape(
        &self,
        admin: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<String, ScrapeError>> + Send + '_>> {
        let next = self
            .0
            .lock()
            .expect("the lock is never poisoned: no test code panics while holding it")
            .get_mut(&admin)
            .and_then(|texts| (!texts.is_empty()).then(|| texts.remove(0)));
        Box::pin(async move {
            next.ok_or(ScrapeError::Failed {
                admin,
                reason: "down".into(),
            })
        })
    }
}

fn exposition(ok: u64, failed: u64) -> String {
    format!(
        "response_total{{direction=\"inbound\",authority=\"web.default\",status_code=\"200\",classification=\"success\"}} {ok}\n\
         response_total{{direction=\"inbound\",authority=\"web.default\",status_code=\"500\",classification=\"failure\"}} {failed}\n\
         response_total{{direction=\"outbound\",authority=\"other\",status_code=\"200\",classification=\"success\"}} 999\n\
         response_latency_ms_bucket{{direction=\"inbound\",authority=\"web.default\",le=\"10\"}} {}\n\
         response_latency_ms_bucket{{direction=\"inbound\",authority=\"web.default\",le=\"+Inf\"}} {}\n",
        ok + failed,
        ok + failed,
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn stat_summary_reports_the_window_between_two_scrapes() {
    let mesh = conduit_proto::mesh_file::parse(
        "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n        admin: 127.0.0.1:4191\n      - addr: 127.0.0.1:9002\n        admin: 127.0.0.1:4192\n      - addr: 127.0.0.1:9003\n",
    )
    .unwrap();
    let a: SocketAddr = "127.0.0.1:4191".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:4192".parse().unwrap();
    let canned = Canned::default();
    canned
        .0
        .lock()
        .unwrap()
        .insert(a, vec![exposition(100, 0), exposition(280, 20)]);
    // The second proxy answers only the first scrape: it cannot contribute a window.
    canned.0.lock().unwrap().insert(b, vec![exposition(50, 50)]);
    let api = ApiService::new(Arc::new(FileDiscovery::new(mesh)))
        .with_metrics_source(Some(Arc::new(canned)));
    let response = api
        .stat_summary(Request::new(StatSummaryRequest {
            workload: String::new(),
            window_ms: 2000,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rows.len(), 1);
    let row = &response.rows[0];
    assert_eq!(row.workload, "web.default");
    assert_eq!((row.success_count, row.failure_count), (180, 20));
    assert_eq!(
        row.requests_per_second_milli, 100_000,
        "200 responses over 2 s"
    );
    assert_eq!((row.scraped_endpoints, row.total_endpoints), (1, 3));
    assert!(row.latency_p50_us.is_some_and(|p50| p50 <= 10_000));
    assert_eq!(row.window_ms, 2000);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn stat_summary_names_unknown_workloads_and_missing_sources() {
    let mesh = conduit_proto::mesh_file::parse("services:\n  web.default: {}\n").unwrap();
    let discovery = Arc::new(FileDiscovery::new(mesh));
    let api =
        ApiService::new(discovery.clone()).with_metrics_source(Some(Arc::new(Canned::default())));
    let err = api
        .stat_summary(Request::new(StatSummaryRequest {
            workload: "nope".into(),
            window_ms: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = ApiService::new(discovery)
        .stat_summary(Request::new(StatSummaryRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

const ROUTED_MESH: &str = "services:
  api.demo:
    endpoints:
      - addr: 127.0.0.1:9001
        admin: 127.0.0.1:4191
      - addr: 127.0.0.1:9002
        admin: 127.0.0.1:4192
    profile:
      routes:
        - name: list-items
          match: { method: GET, path: { exact: /items } }
        - name: get-item
          match: { method: GET, path: { regex: \"/items/[0-9]+\" } }
        - name: create-item
          match: { method: POST, path: { prefix: /items } }
";

/// One proxy's per-route families: `get-item` answered `ok` successes and `failed` failures
/// (all within 10 ms), `list-items` `listed` successes, the default route `other`, and a
/// route the profile no longer has.
fn route_exposition(ok: u64, failed: u64, listed: u64, other: u64) -> String {
    let route = |route: &str, status: u16, class: &str, n: u64| {
        format!(
            "route_request_total{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\"}} {n}\n\
             route_response_total{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\",classification=\"{class}\"}} {n}\n\
             route_response_latency_ms_bucket{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\",le=\"10\"}} {n}\n\
             route_response_latency_ms_bucket{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\",le=\"+Inf\"}} {n}\n\
             route_response_latency_ms_sum{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\"}} {n}\n\
             route_response_latency_ms_count{{direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\"}} {n}\n"
        )
    };
    [
        route("get-item", 200, "success", ok),
        route("get-item", 500, "failure", failed),
        route("list-items", 200, "success", listed),
        route("default", 404, "success", other),
        route("renamed-away", 200, "success", 7),
        // The top-line family is not read per route.
        exposition(1000, 1000),
    ]
    .concat()
}

fn route_request(workload: &str) -> Request<RouteSummaryRequest> {
    Request::new(RouteSummaryRequest {
        workload: workload.into(),
        window_ms: 4000,
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_summary_reports_every_route_over_the_window() {
    let mesh = conduit_proto::mesh_file::parse(ROUTED_MESH).unwrap();
    let a: SocketAddr = "127.0.0.1:4191".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:4192".parse().unwrap();
    let canned = Canned::default();
    canned.0.lock().unwrap().insert(
        a,
        // `list-items` has no series yet at the first scrape: its first requests came after.
        vec![
            route_exposition(100, 0, 0, 5).replace("list-items", "not-yet"),
            route_exposition(260, 20, 40, 5),
        ],
    );
    canned.0.lock().unwrap().insert(
        b,
        vec![route_exposition(0, 0, 0, 0), route_exposition(20, 0, 0, 4)],
    );
    let api = ApiService::new(Arc::new(FileDiscovery::new(mesh)))
        .with_metrics_source(Some(Arc::new(canned)));
    let response = api
        .route_summary(route_request("api.demo"))
        .await
        .unwrap()
        .into_inner();
    let routes: Vec<&str> = response.rows.iter().map(|r| r.route.as_str()).collect();
    assert_eq!(
        routes,
        ["create-item", "get-item", "list-items", "default"],
        "every route of the profile by name, then the default route"
    );
    let row = |name: &str| response.rows.iter().find(|r| r.route == name).unwrap();
    let create = row("create-item");
    assert_eq!((create.success_count, create.failure_count), (0, 0));
    assert_eq!(create.requests_per_second_milli, 0);
    assert_eq!(create.latency_p50_us, None, "no responses, no latency");

    let get = row("get-item");
    assert_eq!(
        (get.success_count, get.failure_count),
        (180, 20),
        "both replicas' windows summed"
    );
    assert_eq!(
        get.requests_per_second_milli, 50_000,
        "200 responses over 4 s"
    );
    assert!(get.latency_p99_us.is_some_and(|p99| p99 <= 10_000));
    assert_eq!(get.window_ms, 4000);

    let list = row("list-items");
    assert_eq!(
        (list.success_count, list.requests_per_second_milli),
        (40, 10_000)
    );
    let default = row("default");
    assert_eq!((default.success_count, default.failure_count), (4, 0));
    assert_eq!(
        (response.scraped_endpoints, response.total_endpoints),
        (2, 2)
    );
    assert_eq!(response.window_ms, 4000);

    // The authority with its port names the workload too.
    let mesh = conduit_proto::mesh_file::parse(ROUTED_MESH).unwrap();
    let api = ApiService::new(Arc::new(FileDiscovery::new(mesh)))
        .with_metrics_source(Some(Arc::new(Canned::default())));
    let response = api
        .route_summary(route_request("api.demo:80"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rows.len(), 4);
    assert_eq!(response.scraped_endpoints, 0, "no proxy answered");
    assert!(response.rows.iter().all(|r| r.success_count == 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_summary_needs_a_known_workload_and_a_source() {
    let mesh = conduit_proto::mesh_file::parse(ROUTED_MESH).unwrap();
    let discovery = Arc::new(FileDiscovery::new(mesh));
    let api =
        ApiService::new(discovery.clone()).with_metrics_source(Some(Arc::new(Canned::default())));
    for (workload, code) in [
        ("", tonic::Code::InvalidArgument),
        ("nope", tonic::Code::NotFound),
        ("api.demo:81", tonic::Code::NotFound),
    ] {
        let err = api
            .route_summary(route_request(workload))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{workload:?}: {err}");
    }
    let err = ApiService::new(discovery)
        .route_summary(route_request("api.demo"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

/// Counts scrapes in flight and the most seen at once.
#[derive(Default)]
struct Counting {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl MetricsSource for Counting {
    fn scrape(
        &self,
        _admin: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<String, ScrapeError>> + Send + '_>> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(exposition(1, 0))
        })
    }
}

/// Goal: a summary of a large workload cannot fan out without bound. Method: a workload of 300
/// endpoints, four summaries at once; scrapes in flight never exceed the bound across calls
/// (`MAX_SCRAPES`), and every endpoint is still scraped.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn summaries_bound_their_scrapes() {
    let mut yaml = String::from("services:\n  web.default:\n    endpoints:\n");
    for i in 0..300u16 {
        yaml.push_str(&format!(
            "      - addr: 127.0.1.{}:{}\n        admin: 127.0.2.{}:{}\n",
            i % 200,
            9000 + i,
            i % 200,
            4000 + i
        ));
    }
    let mesh = conduit_proto::mesh_file::parse(&yaml).unwrap();
    let source = Arc::new(Counting::default());
    let api = ApiService::new(Arc::new(FileDiscovery::new(mesh)))
        .with_metrics_source(Some(Arc::clone(&source) as Arc<dyn MetricsSource>));
    let call = || {
        api.stat_summary(Request::new(StatSummaryRequest {
            workload: "web.default".into(),
            window_ms: 100,
        }))
    };
    let answers = futures_util::future::join_all([call(), call(), call(), call()]).await;
    for answer in answers {
        let row = &answer.unwrap().into_inner().rows[0];
        assert_eq!(row.scraped_endpoints, 300);
    }
    let most = source.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most <= conduit_controller::api::MAX_SCRAPES,
        "{most} scrapes in flight at once"
    );
}
