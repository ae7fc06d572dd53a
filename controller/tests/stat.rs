//! `StatSummary`: the controller scrapes each endpoint's proxy admin server twice, a window
//! apart, and reports the workload's figures over that window.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use conduit_controller::api::ApiService;
use conduit_controller::discovery::file::FileDiscovery;
use conduit_controller::stat::{MetricsSource, ScrapeError};
use conduit_proto::pb::api::StatSummaryRequest;
use conduit_proto::pb::api::api_server::Api;
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
