//! `conduit stat` and `conduit check`: the CLI side of the controller's public API.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use conduit_proto::pb::api::api_client::ApiClient;
use conduit_proto::pb::api::{ListWorkloadsRequest, StatRow, StatSummaryRequest, Workload};
use tonic::transport::{Channel, Endpoint};

use crate::stat::{Figures, Row, render};

/// How long connecting to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn client(controller: SocketAddr) -> anyhow::Result<ApiClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{controller}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .with_context(|| format!("connecting to the controller at {controller}"))?;
    Ok(ApiClient::new(channel))
}

/// The figures of one `StatSummary` row, in the table's terms.
#[must_use]
pub fn figures(row: &StatRow) -> Figures {
    let requests = row.success_count + row.failure_count;
    #[expect(clippy::cast_precision_loss, reason = "ratios for display")]
    let success_rate = (requests > 0).then(|| row.success_count as f64 / requests as f64);
    #[expect(
        clippy::cast_precision_loss,
        reason = "rates and latencies for display"
    )]
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
    #[expect(clippy::cast_precision_loss, reason = "rates for display")]
    let rps = row.requests_per_second_milli as f64 / 1000.0;
    Figures {
        requests,
        success_rate,
        rps,
        p50_ms: ms(row.latency_p50_us),
        p95_ms: ms(row.latency_p95_us),
        p99_ms: ms(row.latency_p99_us),
    }
}

/// Renders `StatSummary` rows; workloads none of whose proxies could be read are marked.
#[must_use]
pub fn render_stat(rows: &[StatRow]) -> String {
    let table: Vec<Row> = rows
        .iter()
        .map(|row| Row {
            name: row.workload.clone(),
            depth: 0,
            figures: figures(row),
        })
        .collect();
    let mut out = render(&table);
    let unread: Vec<&str> = rows
        .iter()
        .filter(|r| r.scraped_endpoints == 0)
        .map(|r| r.workload.as_str())
        .collect();
    if !unread.is_empty() {
        let _ = writeln!(
            out,
            "\nno proxy metrics could be read for: {} (endpoints without an `admin` address in the mesh, or proxies down)",
            unread.join(", ")
        );
    }
    out
}

/// `conduit stat`: one table of every workload's figures over `window`.
///
/// # Errors
///
/// The controller unreachable, or its answer an error.
pub async fn stat(
    controller: SocketAddr,
    workload: Option<String>,
    window: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut api = client(controller).await?;
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let rows = api
        .stat_summary(StatSummaryRequest {
            workload: workload.unwrap_or_default(),
            window_ms,
        })
        .await
        .context("StatSummary")?
        .into_inner()
        .rows;
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "name": row.workload,
                    "figures": figures(row),
                    "endpoints": row.total_endpoints,
                    "scraped_endpoints": row.scraped_endpoints,
                    "window_ms": row.window_ms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_stat(&rows));
    }
    Ok(())
}

/// One line of `conduit check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// `Ok(detail)` or `Err(reason)`.
    pub outcome: Result<String, String>,
}

/// Runs every check against the controller at `controller` (gRPC) and `admin` (its admin
/// port), then each workload endpoint's proxy admin server.
pub async fn checks(controller: SocketAddr, admin: SocketAddr) -> Vec<Check> {
    let mut checks = Vec::new();
    let workloads: Option<Vec<Workload>> = match client(controller).await {
        Ok(mut api) => match api.list_workloads(ListWorkloadsRequest {}).await {
            Ok(response) => {
                let workloads = response.into_inner().workloads;
                checks.push(Check {
                    what: format!("controller API answers at {controller}"),
                    outcome: Ok(format!("{} workloads", workloads.len())),
                });
                Some(workloads)
            }
            Err(status) => {
                checks.push(Check {
                    what: format!("controller API answers at {controller}"),
                    outcome: Err(format!("{}: {}", status.code(), status.message())),
                });
                None
            }
        },
        Err(error) => {
            checks.push(Check {
                what: format!("controller API answers at {controller}"),
                outcome: Err(format!("{error:#}")),
            });
            None
        }
    };
    checks.push(Check {
        what: format!("controller is ready ({admin}/ready)"),
        outcome: probe(admin).await,
    });
    for workload in workloads.unwrap_or_default() {
        for endpoint in &workload.endpoints {
            let addr = endpoint
                .addr
                .as_ref()
                .and_then(|a| conduit_proto::convert::socket_addr("addr", a).ok());
            let name = addr.map_or_else(
                || workload.name.clone(),
                |a| format!("{} {a}", workload.name),
            );
            let admin = endpoint
                .admin
                .as_ref()
                .and_then(|a| conduit_proto::convert::socket_addr("admin", a).ok());
            let outcome = match admin {
                Some(admin) => probe(admin).await.map(|ok| format!("{ok} ({admin})")),
                None => Ok("not probed: no admin address in the mesh".to_owned()),
            };
            checks.push(Check {
                what: format!("proxy for {name} is ready"),
                outcome,
            });
        }
    }
    checks
}

async fn probe(admin: SocketAddr) -> Result<String, String> {
    match crate::demo::http_get(admin, "/ready").await {
        Ok((200, _)) => Ok("ready".to_owned()),
        Ok((status, body)) => Err(format!("answered {status}: {}", body.trim())),
        Err(error) => Err(format!("{error:#}")),
    }
}

/// Renders checks one per line; the second value is whether all passed.
#[must_use]
pub fn render_checks(checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let mut all = true;
    for check in checks {
        match &check.outcome {
            Ok(detail) => {
                let _ = writeln!(out, "[ok]   {}: {detail}", check.what);
            }
            Err(reason) => {
                all = false;
                let _ = writeln!(out, "[FAIL] {}: {reason}", check.what);
            }
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if all {
            "all checks passed"
        } else {
            "some checks failed"
        }
    );
    (out, all)
}
